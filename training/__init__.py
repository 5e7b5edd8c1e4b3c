"""Training side of VPD-SR: data, synthetic degradations, trainers and evaluation (imports ``model``, never ``service``)."""
