"""Training stages of Video LDM: each is a `train.step.Stage` (trainable mask + loss)."""
