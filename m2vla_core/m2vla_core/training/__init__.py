"""Training heads on cached backbone features: dataset format, normalisation, trainer, CLI."""
