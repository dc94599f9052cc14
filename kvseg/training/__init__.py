"""Training: the accelerate set-up of a run, the epoch loop, optimizer and schedule, the checkpoint policy.

``factory`` builds what the loop works with, ``train`` runs one epoch (:func:`train_one_epoch`),
``run`` the run around the epochs (:func:`run_training`), ``finish`` its end (the selected weights
scored once), ``epoch_loss`` averages the epoch's loss over each sample once, ``optim`` holds
optimizer, schedule and weight averaging, ``saver`` decides what is saved when, ``stopping`` when
training stops (preemption included), ``resume`` what a resumed run may change, ``faults`` how a
failure on one process ends them all, ``distributed`` checks the process group. Training scores with
:mod:`kvseg.evaluation` and draws no figure: the command writes the report after it.

May import: :mod:`kvseg.evaluation`, :mod:`kvseg.runs`, :mod:`kvseg.data`, :mod:`kvseg.models` and the base modules.
"""
