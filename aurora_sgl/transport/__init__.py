"""Moving records and weights between processes: shared-memory segments, the signal ring (serving
-> trainer), the weight store (trainer -> serving), the trainer's status segment and the process
handoff file. None of it imports the engine, the trainer or the HTTP stack."""
