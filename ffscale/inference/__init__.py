"""A finished stage as files (the model card and weights), and what reads them without DeepSpeed or
MLflow: the classifier behind `ffscale predict`, evaluation of exported weights."""
