"""batchsr: batch image super-resolution with a U-Net, as a library and a CLI.

Importing the package is cheap: TensorFlow and Keras load only when a model is
built or run.
"""

__version__ = "0.1.0"
