"""Scale-out on Ray Serve: many loraplex replicas behind one OpenAI-compatible ingress,
each request sent to a replica that already holds its adapter. Needs `loraplex[ray]`;
`loraplex serve-ray` runs it, docs/scaling.md explains it."""
