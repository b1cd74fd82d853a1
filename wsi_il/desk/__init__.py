"""The review desk: a local web page (``wsi-il review``) to label review batches, correct labels on the slide,
see the predictions and export, reached from a laptop through an SSH tunnel.

Files remain the contract: each answer is written into the batch's ``labels.csv`` as it is given, a submitted
batch goes through ``session.ingest`` as ``wsi-il ingest`` does, and corrections go into the label ledger through
``corrections.correct_labels``. ``desk.py`` holds what the page can do (no HTTP), ``wsi_il.answers`` the writes into
``labels.csv``, ``images.py`` the pictures, ``server.py`` the web application and its security.
"""
