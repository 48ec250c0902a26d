"""Steps 2-3, the ensemble: per-class evaluation (:mod:`.evaluate`), the selection of the
best set per class (:mod:`.selection`, Algorithm 2), the class-wise merge (:mod:`.merge`,
Algorithm 3), the every-subset analysis (:mod:`.subsets`) and the paper's tables (:mod:`.report`)."""
