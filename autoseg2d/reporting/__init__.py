"""What a reader of a head CT gets from a prediction run: measurements, agreement, report files, QA pictures."""
