"""Judge-free quality metrics of SAEs: planted-feature recovery on synthetic stores, sparse
probing on labelled prompt sets, feature absorption. Every architecture routesae trains or
imports is scored through the same interface."""
