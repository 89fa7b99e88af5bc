"""TorchServe handlers: one image-classifier base and a declarative subclass per data set."""
