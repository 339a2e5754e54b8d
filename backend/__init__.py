"""The clearing backend: ingest, TAC verification, clearing, parameters."""
