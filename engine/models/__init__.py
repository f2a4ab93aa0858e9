"""Models: Hugging Face checkpoints and the paper's CIFAR-scale nets, loaded and saved alike."""
