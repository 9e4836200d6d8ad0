"""Linear classifiers on the cached codes (the notes' "CNN codes" with a linear
softmax or SVM): the exported head (`head`), the sweep of layer and C on val (`sweep`,
scikit-learn), the streamed SGD probe for stores larger than memory (`sgd`), the 2x2 plan
from size and similarity (`strategy`), temperature scaling (`calibration`), the novelty
distance (`novelty`) and both attached to a head (`trust`). Imports core, data, features and
scale.
"""
