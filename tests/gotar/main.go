// gotar lists a tar read from stdin the way Go's archive/tar (what containerd's applier
// uses) reads it: one JSON object per entry, with the sha256 of its logical contents, or a
// final {"error": ...} object where archive/tar fails. A test oracle, not part of the service.
package main

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
)

func main() {
	tr := tar.NewReader(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			out.Encode(map[string]string{"error": err.Error()})
			return
		}
		digest := sha256.New()
		n, err := io.Copy(digest, tr)
		if err != nil {
			out.Encode(map[string]string{"error": err.Error()})
			return
		}
		out.Encode(map[string]interface{}{
			"name": hdr.Name, "typeflag": string(hdr.Typeflag), "size": hdr.Size,
			"read": n, "sha256": hex.EncodeToString(digest.Sum(nil)),
			"uid": hdr.Uid, "gid": hdr.Gid, "mode": hdr.Mode, "mtime": hdr.ModTime.Unix(),
			"linkname": hdr.Linkname, "devmajor": hdr.Devmajor, "devminor": hdr.Devminor,
		})
	}
}
