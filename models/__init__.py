"""Network definitions, the dataset specs that training and serving share, and the shipped weights."""
