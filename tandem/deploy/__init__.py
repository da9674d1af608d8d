"""The Ray cluster deployment: the Serve application builder (`app`, named by deploy/'s
`import_path`) and the one source that renders deploy/ (`gen`, `texts`).
"""
