"""The LightningModule, building and loading models and tokenizers, metrics."""
