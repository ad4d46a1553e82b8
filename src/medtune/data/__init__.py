"""Reading images into an ImageTable: folders, manifests, DICOM, .npz, the generator; quality checks,
duplicates and folds."""
