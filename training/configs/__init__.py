"""Training presets (YAML), shipped as package data so ``--config teacher-small`` works from an installed wheel."""
