"""TorchServe handler for mnist: grayscale 28×28, light ink on dark (dark-on-light images are inverted)."""
from handlers.image_classifier import ImageClassifier
from models.specs import MNIST


class MnistClassifier(ImageClassifier):
    spec = MNIST
