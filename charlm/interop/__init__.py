"""Other runtimes and libraries: ONNX export, Keras and Trax weights in and out."""
