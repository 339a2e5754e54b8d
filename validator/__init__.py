"""The bus and metro validator (issue 3): decision core, tap loop, journal."""
