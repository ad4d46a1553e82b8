"""The deployable model: fold ensembles kept from the store, prediction and export."""
