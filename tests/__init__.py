"""CPU tests with tiny generated data (pytest; the process-level ones carry the slow marker);
tiny.py and fault_driver.py are their helpers."""
