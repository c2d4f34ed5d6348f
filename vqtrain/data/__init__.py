"""Data modules: images (embedded shapes, MNIST, CIFAR-10, any folder) and padded audio."""
