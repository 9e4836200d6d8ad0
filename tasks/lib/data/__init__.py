"""The images and their labels: the sources a manifest is taken from (`sources`), the
manifest itself (`manifest`), which files are images (`imagefiles`), the one decoding
function (`decode`), the cache of file hashes (`hashcache`) and whose files an output folder
holds (`ownership`). Imports only core.
"""
