"""fundament: serve, adapt and measure pretrained foundation models offline through the OpenAI API."""

__version__ = "0.1.0"
