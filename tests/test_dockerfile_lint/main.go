// dockerfile-lint runs BuildKit's own Dockerfile checks (the rules of `docker build --check`)
// on a Dockerfile without a daemon or a registry, and prints the findings as JSON:
//
//	dockerfile-lint Dockerfile > findings.json
//
// tests/test_dockerfile.py builds it from the Go module proxy and asserts it finds nothing.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	digest "github.com/opencontainers/go-digest"
)

// offlineImages answers every base image lookup with a bare Linux image whose only setting is
// the usual PATH: no registry is reachable here, and the checks are about the Dockerfile's
// own text, not the base images' contents.
type offlineImages struct{}

func (offlineImages) ResolveImageConfig(_ context.Context, ref string, _ sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	config := []byte(`{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}}`)
	return ref, digest.FromBytes(config), config, nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: dockerfile-lint DOCKERFILE")
		os.Exit(2)
	}
	source, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	sourceMap := llb.NewSourceMap(nil, os.Args[1], "Dockerfile", source)
	sourceMap.Definition = &llb.Definition{}
	opt := dockerfile2llb.ConvertOpt{SourceMap: sourceMap, MetaResolver: offlineImages{}}
	results, err := dockerfile2llb.DockerfileLint(context.Background(), source, opt)
	if err != nil {
		fmt.Fprintln(os.Stderr, "lint:", err)
		os.Exit(1)
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
