"""Pure `keras.ops` maths of the descriptor: pooling and resizing, the R-MAC
region grid, box geometry and the RPN's proposals (anchors, NMS)."""
