"""The statistics: activation probes, drift, CKA, paired comparisons, prediction bounds, calibration records."""
