"""The clearing backend (issue 4): ingest, TAC verification, clearing, parameters."""
