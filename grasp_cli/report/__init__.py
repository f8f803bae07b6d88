"""`grasp report`: one self-contained HTML page (figures embedded) of everything in a run."""
