"""The results version: which stored numbers a resumed store may reuse.

Bump `RESULTS_VERSION` whenever a change alters stored numbers (a metric's definition, the
predictions a cell writes, how a fold is split or trained). It is part of every cell's id, so a
rerun after a bump recomputes every cell instead of keeping numbers from older code, and it is
stored with each cell so `medtune results` / `report` can flag a store that mixes versions.

History: 1 = cells written before the version existed (no `results_version` in their config);
2 = binary AUC scored on the declared positive class (it used column 1 whatever `positive` said);
    macro PPV/NPV count an undefined class as 0 (they skipped it); PR-AUC, Brier score and ECE stored.
3 = `train.class_weight: balanced` by default for both heads (the softmax loss was unweighted), the
    SVM's calibration folds grouped by patient, `{choose: [...]}` choices and auto_depth in grid/select.py
    (ties to the lower inner loss).
    Also: at `views: 1` the uncached path (cache: false, or nothing frozen as in full_ft) no longer draws from
    the training generator, so its epoch order from epoch 2 on is the cached path's.
    And: depth in the papers' units (blocks per bottleneck/dense block/MBConv stage, VGG's conv blocks,
    partial_ft(fraction) over layers); the linear probe fitted to convergence (logistic regression);
    LP-FT under the experiment's BatchNorm rule; one fixed-view augmentation regime for every
    strategy; Auto-SNR's unbiased variance.
4 = BitFit keeps its frozen tensors out of the backward pass (`trains_tensor`), so a leading layer
    with no bias or norm (the stem convolution) counts as frozen and its output comes from the
    feature cache: the same weights in fp32 (bit-identical), but under bf16 the cached prefix's
    kernels differ from the training batch's and predictions move (up to 0.012 after 2 epochs on
    the test model). New strategies `lora` and `ssf`; cells record their own `cache_hits`.
5 = the SVM and kNN heads are fitted on the fit part only (they were refitted on fit + inner
    validation), like the softmax head: their inner-validation predictions, which racing, the
    recommended strategy and the operating points read, had come from a model fitted on those
    very images (an SVM on frozen BUSI features: 0.93-0.99 there, 0.77-0.80 on the test folds).
    Also: racing floors the fold differences' variance (grid/racing.py), so it prunes fewer candidates.
6 = lp_ft re-estimates the BatchNorm statistics on the training images before its probe under
    `bn_statistics: update` (`refresh_bn`, on by default): its probe had been fitted on the pretrained
    statistics while fine-tuning normalised with batch statistics, so fine-tuning began from a head
    that did not fit its features and early stopping kept the probe. Only lp_ft's numbers change, but
    its new parameter alone would leave the old lp_ft cells readable beside the new ones (a second
    lp_ft group in a resumed store), so the version moves.
7 = the linear probe (linear_probe, lp_ft's first phase, auto_depth's probe candidate) fits the final
    linear classifier alone, on the frozen penultimate features (`classifier` unit). On VGG the head
    of the block chain is the fc block (fc6, fc7, classifier), so the probe had trained 89% of VGG16's
    parameters by SGD under the probe's name; only VGG's probe cells change (on every other backbone
    the head block is the classifier), but the version is what a resumed store keys on.
8 = (issue 37) training no longer depends on the head: with an svm/knn head listed before softmax, a
    strategy that trains no backbone (linear_probe) had been trained with 0 epochs and the softmax cell
    scored that untrained classifier (configs/smoke.yaml: 0.243 against 0.375); every head is now fitted
    on the one network its strategy trained (linear_probe's svm/knn features are bit-identical, so those
    cells keep their numbers). The probe's C, the SVM's C and kNN's k widen past an end of their start
    grids that wins on the inner split (probe.search; C within 1e-6..1e4, k within 1..n): cells whose
    pick sat at an end change. The linear classifier runs in fp32 under autocast (the probe's folded
    standardisation flipped decisions in bf16): every bf16 cell moves a little, fp32 cells do not.
    VGG's partial_ft(fraction) counts fc6 and fc7 as layers (every fraction up to 3/16 had trained the
    whole fc block). Cell ids now also hash the precision resolved on the device (`amp: auto` on a CPU
    vs a GPU) and the grids and constants above (cells.numerics); tests/test_fingerprint.py fails when
    a tiny grid's predictions move without a bump.
"""

__version__ = "0.1.0"  # the package version (pyproject.toml); here so modules need not import the package

RESULTS_VERSION = 8

UNVERSIONED = 1  # what a cell without a recorded version counts as
