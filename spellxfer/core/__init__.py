"""The floor every step stands on: user-facing errors, atomic outputs and strict readers, the
embedded assets and the environment report. Imports nothing else from spellxfer and no torch."""
