"""The bus and metro validator: decision core, tap loop, journal."""
