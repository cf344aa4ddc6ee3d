"""mmllm: assemble, train and run any-to-any multimodal models from pretrained parts."""

__version__ = "0.1.0"
