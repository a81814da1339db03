"""The Auto3DSeg pipeline around the segresnet2d template, one module per stage."""
