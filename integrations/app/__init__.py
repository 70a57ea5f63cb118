"""The paper's application of the TRL integration: the training script (:mod:`.train`, settings in
:mod:`.settings`, report in :mod:`.run_report`), the tiny model's warm-up, the rewards and data, the evaluator
(:mod:`.evaluate`), the toy gate study (:mod:`.toy_study`) and the tensor-parallel example (:mod:`.tensor_parallel`).
"""
