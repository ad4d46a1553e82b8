"""The results version: which stored numbers a resumed store may reuse.

Bump `RESULTS_VERSION` whenever a change alters stored numbers (a metric's definition, the
predictions a cell writes, how a fold is split or trained). It is part of every cell's id, so a
rerun after a bump recomputes every cell instead of keeping numbers from older code, and it is
stored with each cell so `medtune results` / `report` can flag a store that mixes versions.

History: 1 = cells written before the version existed (no `results_version` in their config);
2 = binary AUC scored on the declared positive class (it used column 1 whatever `positive` said);
    macro PPV/NPV count an undefined class as 0 (they skipped it); PR-AUC, Brier score and ECE stored.
3 = `train.class_weight: balanced` by default for both heads (the softmax loss was unweighted), the
    SVM's calibration folds grouped by patient, `{choose: [...]}` choices and auto_depth in select.py
    (ties to the lower inner loss).
    Also: at `views: 1` the uncached path (cache: false, or nothing frozen as in full_ft) no longer draws from
    the training generator, so its epoch order from epoch 2 on is the cached path's.
    And: depth in the papers' units (blocks per bottleneck/dense block/MBConv stage, VGG's conv blocks,
    partial_ft(fraction) over layers); the linear probe fitted to convergence (logistic regression);
    LP-FT under the experiment's BatchNorm rule; one fixed-view augmentation regime for every
    strategy; Auto-SNR's unbiased variance.
"""

RESULTS_VERSION = 3

UNVERSIONED = 1  # what a cell without a recorded version counts as
