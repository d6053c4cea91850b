"""CNN backbones cut at their last convolution (`registry`): Keras
applications, EfficientNet-Lite and torchvision's ResNets."""
