"""Image classification task: MNIST, the CIFAR-10 subset, scikit-learn digits and ImageFolder-style trees."""
