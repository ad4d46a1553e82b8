"""What a person reads: the HTML report, the model card, Grad-CAM explanations, MLflow tracking."""
