"""Class-conditional generators: networks, losses, training, files and sampling."""
