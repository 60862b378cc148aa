"""Qt-free core of the MiniGPTMedSlicer module: wire protocol, HTTP client, PNG encoding, slice capture,
geometry and markups. Shared by the Slicer module, the headless runner and the tests. No side effects on import."""
