//! TensorBoard event files: CRC32C against published vectors, the TFRecord framing and Event
//! protobuf bytes of one record written out by hand, and a file read back record by record.

use unet3d::train::tensorboard::{
    EventWriter, file_version_event, masked_crc32c, record, scalars_event, text_event,
};

/// TFRecord's mask, written out as its definition gives it (shifts, not the library's rotate):
/// rotate right by 15 bits, add 0xa282ead8.
#[allow(clippy::manual_rotate)]
fn mask(crc: u32) -> u32 {
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

#[test]
fn crc32c_matches_published_vectors() {
    // RFC 3720 (iSCSI) B.4 and the common check value.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c::crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    let ascending: Vec<u8> = (0..32).collect();
    assert_eq!(crc32c::crc32c(&ascending), 0x46DD_794E);
    assert_eq!(masked_crc32c(b"123456789"), mask(0xE306_9283));
}

#[test]
fn one_scalar_record_byte_by_byte() {
    let payload = scalars_event(1.5, 3, &[("a".to_string(), 2.0)]);
    #[rustfmt::skip]
    let want: Vec<u8> = vec![
        0x09, 0, 0, 0, 0, 0, 0, 0xF8, 0x3F, // field 1 wall_time, double 1.5
        0x10, 0x03,                         // field 2 step, varint 3
        0x2A, 0x0A,                         // field 5 summary, 10 bytes
        0x0A, 0x08,                         //   Summary.value, 8 bytes
        0x0A, 0x01, b'a',                   //     Value.tag "a"
        0x15, 0, 0, 0, 0x40,                //     Value.simple_value, float 2.0
    ];
    assert_eq!(payload, want);
    let rec = record(&payload);
    let len = 23u64.to_le_bytes();
    assert_eq!(&rec[..8], &len);
    assert_eq!(&rec[8..12], &mask(crc32c::crc32c(&len)).to_le_bytes());
    assert_eq!(&rec[12..35], &want[..]);
    assert_eq!(&rec[35..], &mask(crc32c::crc32c(&want)).to_le_bytes());

    let version = file_version_event(0.0);
    let mut want = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x00, 0x1A, 13];
    want.extend_from_slice(b"brain.Event:2");
    assert_eq!(version, want);
}

#[test]
fn one_text_record_byte_by_byte() {
    #[rustfmt::skip]
    let want: Vec<u8> = vec![
        0x09, 0, 0, 0, 0, 0, 0, 0, 0,       // field 1 wall_time, double 0.0
        0x10, 0x00,                         // field 2 step 0
        0x2A, 24,                           // field 5 summary
        0x0A, 22,                           //   Summary.value
        0x0A, 0x01, b't',                   //     Value.tag "t"
        0x4A, 8,                            //     Value.metadata (field 9)
        0x0A, 6,                            //       SummaryMetadata.plugin_data
        0x0A, 4, b't', b'e', b'x', b't',    //         PluginData.plugin_name "text"
        0x42, 7,                            //     Value.tensor (field 8)
        0x08, 7,                            //       TensorProto.dtype DT_STRING
        0x12, 0,                            //       tensor_shape: a scalar
        0x42, 1, b'x',                      //       string_val "x"
    ];
    assert_eq!(text_event(0.0, 0, "t", "x"), want);
}

#[test]
fn multi_byte_steps_are_varints() {
    let p = scalars_event(0.0, 300, &[]);
    assert_eq!(&p[9..12], &[0x10, 0xAC, 0x02]);
}

#[test]
fn an_event_file_reads_back_record_by_record() {
    let dir = std::env::temp_dir().join(format!("unet3d-tb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut w = EventWriter::create(&dir).unwrap();
    w.scalars(1, &[("train/loss".to_string(), 0.25), ("val/dice".to_string(), 0.5)]).unwrap();
    w.scalars(2, &[("train/loss".to_string(), 0.125)]).unwrap();
    let path = w.path().to_path_buf();
    // A second writer in the same second gets its own file.
    let w2 = EventWriter::create(&dir).unwrap();
    assert_ne!(w2.path(), path);
    assert!(path.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
    let bytes = std::fs::read(&path).unwrap();
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(len_crc, mask(crc32c::crc32c(&bytes[at..at + 8])));
        let data = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, mask(crc32c::crc32c(data)));
        records.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(records.len(), 3);
    assert!(records[0].ends_with(b"brain.Event:2"));
    let has = |r: &[u8], s: &[u8]| r.windows(s.len()).any(|w| w == s);
    assert!(has(&records[1], b"train/loss") && has(&records[1], b"val/dice"));
    assert!(has(&records[1], &0.25f32.to_le_bytes()) && has(&records[2], &0.125f32.to_le_bytes()));
    std::fs::remove_dir_all(&dir).unwrap();
}
