//! Analytic image evaluator.
