"""Using a trained model: sampling, explain mode, scoring a text, and a text read through the model."""
