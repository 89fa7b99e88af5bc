"""TorchServe handler for every cifar10 version: RGB, 32×32, CIFAR-10's mean/std and class names."""
from handlers.image_classifier import ImageClassifier
from models.specs import CIFAR10


class Cifar10Classifier(ImageClassifier):
    spec = CIFAR10
