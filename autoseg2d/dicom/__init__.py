"""DICOM in (a CT series folder read into HU and geometry) and DICOM SEG out."""
