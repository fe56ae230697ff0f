"""Data: embedded sets and sources by reference, the decoded-image cache, image readers, preprocessing."""
