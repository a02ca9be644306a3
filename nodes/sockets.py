"""Socket type names and the menu category shared by every NextStep node (they are part of saved workflows)."""

CATEGORY = "NextStep"
MODEL = "NEXTSTEP_MODEL"
VAE = "NEXTSTEP_VAE"
CONDITIONING = "NEXTSTEP_CONDITIONING"
