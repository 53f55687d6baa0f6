"""Test helpers shared by unit and component tests (tiny models built on the fly)."""
