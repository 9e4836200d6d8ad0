"""The ground floor: what every wing uses and nothing in it knows of images, codes or
models. The errors a user sees (`errors`), atomic files and hashes (`files`), the typed
params.yaml (`params`), progress lines (`progress`), the process's lifetime and interrupts
(`lifetime`, `interrupts`), the torch device and its threads (`device`), the one door to git
(`gitrepo`), the files one stage hands to another, one pydantic model each (`handoff`), each
stage's code for DVC (`codedeps`) and the checkpoint folder on disk (`checkpoint`). Imports
no other wing.
"""
